package de.medizininformatik_initiative.omi.dsf;

import java.util.Objects;

import org.camunda.bpm.engine.delegate.DelegateExecution;
import org.camunda.bpm.engine.delegate.ExecutionListener;
import org.camunda.bpm.model.bpmn.instance.UserTask;
import org.camunda.bpm.model.bpmn.instance.FlowElement;
import org.hl7.fhir.r4.model.QuestionnaireResponse;
import org.hl7.fhir.r4.model.QuestionnaireResponse.QuestionnaireResponseItemComponent;
import org.springframework.beans.factory.InitializingBean;

import dev.dsf.bpe.v1.ProcessPluginApi;
import dev.dsf.bpe.v1.variables.Variables;

/**
 * Closes an external work item: when its user task ends, the answers of the completed
 * QuestionnaireResponse become process variables named by the items' linkIds.
 * <p>
 * Runs unchanged on DSF 1.x (Camunda) and 2.x (Operaton): DSF 2.x loads v1 plugins through a class
 * loader that renames {@code org.camunda.bpm} to {@code org.operaton.bpm} in the byte code, and
 * Operaton's model API renamed the {@code getCamunda*} accessors, so this class reads the form key as
 * the plain XML attribute it is instead of calling {@code UserTask.getCamundaFormKey()}. It calls it on
 * a {@code UserTask}: DSF 2.x shows v1 plugins only {@code org.operaton.bpm.model.bpmn.instance} of the
 * model API, not the {@code model.xml} interfaces that declare the method.
 */
public class WorkItemAnswers implements ExecutionListener, InitializingBean
{
	/** The namespace of {@code camunda:formKey} in the generated BPMN, and Operaton's own. */
	private static final String[] FORM_KEY_NAMESPACES = { "http://camunda.org/schema/1.0/bpmn",
			"http://operaton.org/schema/1.0/bpmn" };

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
		String formKey = formKey(execution.getBpmnModelElementInstance());

		// a user task cancelled by its timeout has no answers of its own: keep the variables as they are
		if (response == null || formKey == null || !formKey.equals(response.getQuestionnaire()))
			return;

		for (QuestionnaireResponseItemComponent item : response.getItem())
		{
			if (!WorkItemListener.isDsfItem(item.getLinkId()) && item.hasAnswer() && item.getAnswerFirstRep().hasValue())
				Values.setVariable(variables, item.getLinkId(), item.getAnswerFirstRep().getValue());
		}
	}

	static String formKey(FlowElement element)
	{
		if (!(element instanceof UserTask userTask))
			return null;
		for (String namespace : FORM_KEY_NAMESPACES)
		{
			String value = userTask.getAttributeValueNs(namespace, "formKey");
			if (value != null)
				return value;
		}
		return null;
	}
}
