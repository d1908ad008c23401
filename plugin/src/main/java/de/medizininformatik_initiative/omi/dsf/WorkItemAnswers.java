package de.medizininformatik_initiative.omi.dsf;

import java.util.Objects;

import org.camunda.bpm.engine.delegate.DelegateExecution;
import org.camunda.bpm.engine.delegate.ExecutionListener;
import org.camunda.bpm.model.bpmn.instance.UserTask;
import org.hl7.fhir.r4.model.QuestionnaireResponse;
import org.hl7.fhir.r4.model.QuestionnaireResponse.QuestionnaireResponseItemComponent;
import org.springframework.beans.factory.InitializingBean;

import dev.dsf.bpe.v1.ProcessPluginApi;
import dev.dsf.bpe.v1.variables.Variables;

/**
 * Closes an external work item: when its user task ends, the answers of the completed
 * QuestionnaireResponse become process variables named by the items' linkIds.
 */
public class WorkItemAnswers implements ExecutionListener, InitializingBean
{
	private final ProcessPluginApi api;

	public WorkItemAnswers(ProcessPluginApi api)
	{
		this.api = api;
	}

	@Override
	public void afterPropertiesSet()
	{
		Objects.requireNonNull(api, "api");
	}

	@Override
	public void notify(DelegateExecution execution)
	{
		Variables variables = api.getVariables(execution);
		QuestionnaireResponse response = variables.getLatestReceivedQuestionnaireResponse();
		String formKey = execution.getBpmnModelElementInstance() instanceof UserTask u ? u.getCamundaFormKey() : null;

		// a user task cancelled by its timeout has no answers of its own: keep the variables as they are
		if (response == null || formKey == null || !formKey.equals(response.getQuestionnaire()))
			return;

		for (QuestionnaireResponseItemComponent item : response.getItem())
		{
			if (!WorkItemListener.isDsfItem(item.getLinkId()) && item.hasAnswer() && item.getAnswerFirstRep().hasValue())
				Values.setVariable(variables, item.getLinkId(), item.getAnswerFirstRep().getValue());
		}
	}
}
