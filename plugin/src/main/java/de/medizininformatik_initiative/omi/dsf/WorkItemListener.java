package de.medizininformatik_initiative.omi.dsf;

import java.util.Collections;
import java.util.Map;
import java.util.Objects;

import org.camunda.bpm.engine.delegate.DelegateExecution;
import org.camunda.bpm.engine.delegate.DelegateTask;
import org.camunda.bpm.engine.delegate.TaskListener;
import org.camunda.bpm.engine.impl.cfg.TransactionState;
import org.camunda.bpm.engine.impl.context.Context;
import org.hl7.fhir.r4.model.Bundle;
import org.hl7.fhir.r4.model.Questionnaire;
import org.hl7.fhir.r4.model.Questionnaire.QuestionnaireItemComponent;
import org.hl7.fhir.r4.model.QuestionnaireResponse;
import org.hl7.fhir.r4.model.QuestionnaireResponse.QuestionnaireResponseStatus;
import org.hl7.fhir.r4.model.Reference;
import org.hl7.fhir.r4.model.ResourceType;
import org.hl7.fhir.r4.model.StringType;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.beans.factory.InitializingBean;

import dev.dsf.bpe.v1.ProcessPluginApi;
import dev.dsf.bpe.v1.constants.CodeSystems.BpmnUserTask;
import dev.dsf.bpe.v1.variables.Variables;

/**
 * Opens an external work item: the in-progress QuestionnaireResponse of a user task, with every item
 * that names a process variable answered with its value (the step's inputs) and the others left open
 * (the step's outputs, for a worker to answer).
 * <p>
 * Unlike the DSF's DefaultUserTaskListener it creates the response only once the engine has
 * committed the user task: a worker may answer within milliseconds, and the BPE cannot complete a
 * user task that is not in its database yet ("Cannot find task"), which would leave the process
 * waiting for good.
 */
public class WorkItemListener implements TaskListener, InitializingBean
{
	private static final Logger logger = LoggerFactory.getLogger(WorkItemListener.class);

	private final ProcessPluginApi api;

	public WorkItemListener(ProcessPluginApi api)
	{
		this.api = api;
	}

	@Override
	public void afterPropertiesSet()
	{
		Objects.requireNonNull(api, "api");
	}

	static boolean isDsfItem(String linkId)
	{
		return BpmnUserTask.Codes.BUSINESS_KEY.equals(linkId) || BpmnUserTask.Codes.USER_TASK_ID.equals(linkId);
	}

	@Override
	public void notify(DelegateTask userTask)
	{
		DelegateExecution execution = userTask.getExecution();
		Variables variables = api.getVariables(execution);
		String formKey = userTask.getBpmnModelElementInstance().getCamundaFormKey();
		// built now, inside the transaction, while the variables are at hand
		QuestionnaireResponse response = build(readQuestionnaire(formKey), formKey, execution.getBusinessKey(),
				userTask.getId(), variables);

		Context.getCommandContext().getTransactionContext().addTransactionListener(TransactionState.COMMITTED,
				commandContext -> create(response, execution.getBusinessKey()));
	}

	private void create(QuestionnaireResponse response, String businessKey)
	{
		try
		{
			QuestionnaireResponse created = api.getFhirWebserviceClientProvider().getLocalWebserviceClient()
					.withRetryForever(60000).create(response);
			logger.info("Work item {} opened for business key {}",
					api.getQuestionnaireResponseHelper().getLocalVersionlessAbsoluteUrl(created), businessKey);
		}
		catch (Exception e)
		{
			// the user task's boundary timer ends the process with a clear error
			logger.error("Work item for business key {} could not be created: {} - {}", businessKey,
					e.getClass().getName(), e.getMessage());
		}
	}

	private Questionnaire readQuestionnaire(String urlWithVersion)
	{
		Bundle search = api.getFhirWebserviceClientProvider().getLocalWebserviceClient().search(Questionnaire.class,
				Map.of("url", Collections.singletonList(urlWithVersion)));
		return search.getEntry().stream().filter(Bundle.BundleEntryComponent::hasResource)
				.map(Bundle.BundleEntryComponent::getResource).filter(r -> r instanceof Questionnaire)
				.map(r -> (Questionnaire) r).findFirst()
				.orElseThrow(() -> new IllegalStateException("no Questionnaire " + urlWithVersion));
	}

	private QuestionnaireResponse build(Questionnaire questionnaire, String formKey, String businessKey,
			String userTaskId, Variables variables)
	{
		QuestionnaireResponse response = new QuestionnaireResponse();
		response.setQuestionnaire(formKey);
		response.setStatus(QuestionnaireResponseStatus.INPROGRESS);
		response.setAuthor(new Reference().setType(ResourceType.Organization.name())
				.setIdentifier(api.getOrganizationProvider().getLocalOrganizationIdentifier()
						.orElseThrow(() -> new IllegalStateException("local organization identifier unknown"))));
		api.getQuestionnaireResponseHelper().addItemLeafWithAnswer(response, BpmnUserTask.Codes.BUSINESS_KEY,
				"The business-key of the process execution", new StringType(businessKey));
		api.getQuestionnaireResponseHelper().addItemLeafWithAnswer(response, BpmnUserTask.Codes.USER_TASK_ID,
				"The user-task-id of the process execution", new StringType(userTaskId));

		for (QuestionnaireItemComponent question : questionnaire.getItem())
		{
			if (isDsfItem(question.getLinkId()))
				continue;
			Object value = variables.getVariable(question.getLinkId());
			if (value != null && question.getType() != Questionnaire.QuestionnaireItemType.DISPLAY)
				api.getQuestionnaireResponseHelper().addItemLeafWithAnswer(response, question.getLinkId(),
						question.getText(), Values.toFhir(value));
			else
				api.getQuestionnaireResponseHelper().addItemLeafWithoutAnswer(response, question.getLinkId(),
						question.getText());
		}
		return response;
	}
}
